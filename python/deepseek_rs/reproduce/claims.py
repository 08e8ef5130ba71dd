"""Every claim of the article (shared/seed/000_029ceb382c22c9f4.txt), in its order, one row each."""

from __future__ import annotations

from typing import Dict, Tuple

from .ledger import Claim

CLAIMS: Tuple[Claim, ...] = (
    Claim(
        "dar-work",
        "1 architecture",
        "Dynamic Attention Routing (a learnable gate sets the attention range) at 1024 tokens",
        "在处理1024长度序列时，DAR可将平均注意力计算量降低42%，同时保持98.7%的任务准确率（对比基线模型）",
        "-42% attention compute, 98.7% of the baseline's accuracy",
    ),
    Claim(
        "dar-latency",
        "5 recommendations",
        "DAR on long text: latency at 16K tokens",
        "长文本处理场景：优先选择DAR架构版本，实测16K序列处理延迟降低57%",
        "-57% latency at 16K tokens",
    ),
    Claim(
        "pea",
        "1 architecture",
        "Progressive Expert Activation (input-dependent number of experts) in language modelling",
        "在语言建模任务中实现每token计算量减少35%的同时，模型困惑度（Perplexity）降低12%",
        "-35% compute per token and -12% perplexity",
    ),
    Claim(
        "filter",
        "2 training",
        "The multi-stage data filter raises the quality of the training set",
        "通过多阶段数据过滤管道实现训练集质量提升",
        "no number (better training data)",
    ),
    Claim(
        "entropy-bert",
        "2 training",
        "Semantic-density filtering: a light BERT computes the text's information entropy",
        "语义密度过滤：使用轻量级BERT模型计算文本信息熵，剔除低价值数据",
        "no number (low-value data removed)",
    ),
    Claim(
        "lda",
        "2 training",
        "Domain screening with a topic model (LDA)",
        "领域适配筛选：基于主题模型（LDA）构建领域知识图谱，确保数据专业性",
        "no number (in-domain data kept)",
    ),
    Claim(
        "hard-examples",
        "2 training",
        "Hard-example mining finds high-value training samples",
        "难例挖掘机制：采用对比学习框架自动识别高价值训练样本",
        "no number (high-value samples found)",
    ),
    Claim(
        "gvrt",
        "2 training",
        "GVRT: dynamic learning rate and gradient clipping threshold",
        "梯度方差缩减训练（GVRT），通过动态调整学习率与梯度裁剪阈值",
        "no number of its own (better training than fixed settings)",
    ),
    Claim(
        "utilisation-3d",
        "2 training",
        "Hardware utilisation in 3D-parallel training (data, model, pipeline parallel)",
        "在3D并行训练……场景下实现98.7%的硬件利用率（行业平均水平约85%）",
        "98.7% utilisation (industry average about 85%)",
    ),
    Claim(
        "fp16-kernel",
        "2 training",
        "Custom CUDA kernels for FP16 matrix products",
        "深度定制的CUDA内核优化使FP16精度下的矩阵运算效率提升27%，在A100集群上实现每秒312TFLOPS的有效算力",
        "+27% FP16 GEMM efficiency, 312 TFLOPS effective on A100",
    ),
    Claim(
        "uss-recall",
        "3 multimodal",
        "Unified Semantic Space: text-to-image retrieval",
        "文本→图像检索：Recall@10从67.3%提升至82.1%",
        "Recall@10 67.3% -> 82.1% (against a two-tower model)",
    ),
    Claim(
        "uss-bleu",
        "3 multimodal",
        "Unified Semantic Space: image-to-text generation",
        "图像→文本生成：BLEU-4得分从28.7提升至39.2",
        "BLEU-4 28.7 -> 39.2",
    ),
    Claim(
        "uss-data",
        "5 recommendations",
        "USS pre-trained models save fine-tuning data",
        "多模态应用：使用USS框架的预训练模型，可节省73%的微调数据量",
        "73% less fine-tuning data",
    ),
    Claim(
        "qat",
        "4 engineering",
        "INT8 quantization-aware training",
        "量化感知训练（QAT）：支持INT8量化下99.2%的原始精度保持",
        "99.2% of the original accuracy at INT8",
    ),
    Claim(
        "batching",
        "4 engineering",
        "Dynamic batching engine (batch size set by the requests)",
        "动态批处理引擎：根据请求特征动态调整批处理大小，QPS提升3.8倍",
        "QPS x3.8",
    ),
    Claim(
        "deployment",
        "4 engineering",
        "A finance customer's deployment with the optimizations (the YAML below)",
        "在某金融客户的实际部署中，通过上述优化将推理延迟从127ms降至38ms，同时内存占用减少62%",
        "latency 127 -> 38 ms, memory -62%",
    ),
    Claim(
        "nas",
        "4 engineering",
        "Edge devices: neural architecture search generates sub-models per hardware",
        "边缘设备适配：通过模型结构搜索（NAS）自动生成适配不同硬件的子模型",
        "no number (sub-models per device)",
    ),
    Claim(
        "pea-lite",
        "5 recommendations",
        "The lite PEA-MoE for constrained resources",
        "资源受限环境：采用PEA-MoE架构的轻量版，在保持92%性能的同时模型体积减少68%",
        "92% of the performance at -68% model size",
    ),
    Claim(
        "yaml",
        "4 engineering",
        "The optimization configuration (QAT int8, dynamic batching 4..32, T4 mixed precision)",
        "具体配置如下：optimization: quantization: method: QAT … batching: strategy: dynamic … hardware: "
        "target: nvidia_tesla_t4 precision: mixed",
        "the YAML applied as printed",
    ),
)

BY_ID: Dict[str, Claim] = {c.id: c for c in CLAIMS}

__all__ = ["BY_ID", "CLAIMS"]

"""INT8 quantization: quantization-aware training (QAT) and int8 inference (:mod:`.qat`)."""

from .qat import (
    Int8Linear,
    Int8SwiGLUExperts,
    QATLinear,
    QATSwiGLUExperts,
    convert_int8,
    fake_quantize,
    int8_matmul,
    model_bytes,
    prepare_qat,
    quantize_rows,
)

__all__ = [
    "Int8Linear",
    "Int8SwiGLUExperts",
    "QATLinear",
    "QATSwiGLUExperts",
    "convert_int8",
    "fake_quantize",
    "int8_matmul",
    "model_bytes",
    "prepare_qat",
    "quantize_rows",
]

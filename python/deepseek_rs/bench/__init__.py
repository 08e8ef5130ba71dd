"""The code behind ``deepseek-rs bench ...``: one module per benchmark, each printing its
workload, baseline, ours, ratio and the machine."""

"""lingshu_fast: a custom-kernel trainer for Lingshu-style medical multimodal LLMs (Qwen2.5-VL)."""
__version__ = "0.1.0"

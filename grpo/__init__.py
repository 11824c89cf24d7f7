"""grpo: a local GRPO engine that mirrors Amazon Bedrock reinforcement fine-tuning (RFT)."""

__version__ = "0.1.0"

"""harness: which fine-tuning method beats QLoRA, measured."""

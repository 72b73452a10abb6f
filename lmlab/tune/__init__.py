"""Fine-tuning a pretrained checkpoint: SFT on chats and instructions, parameter-efficient adapters (LoRA, DoRA,
QLoRA, IA3, prefix tuning) and knowledge distillation, all as objectives on the one training loop."""

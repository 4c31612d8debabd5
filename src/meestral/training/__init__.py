"""Training with the backbone frozen or adapted: exit heads, early-exit adaptation (LoRA),
distillation of a Mamba-2 student; one shared loop core."""

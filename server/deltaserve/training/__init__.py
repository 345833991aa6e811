"""Full-parameter fine-tuning on the CPU (see `trainer.finetune`)."""

"""LoRA adapters: PEFT's files read and written (peft_files.py); more to come for serving."""

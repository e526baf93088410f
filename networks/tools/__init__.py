"""The networks' commands: ``summary`` (parameter counts) and ``benchmark`` (full fine-tuning vs Med-Tuning)."""

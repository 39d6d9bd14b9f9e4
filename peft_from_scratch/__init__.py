"""peft_from_scratch: parameter-efficient fine-tuning methods built from scratch."""

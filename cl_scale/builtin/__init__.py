"""The built-in tiny models (`builtin:tiny-llama`, `builtin:tiny-t5`): what they are (`specs`, torch-free),
their configs and builder (`tiny`) and how they are made and cached (`factory`)."""

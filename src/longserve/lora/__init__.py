"""LoRA adapters served beside one base model: read from PEFT directories (``adapter``), written into
preallocated slots on every projection they target (``slots``), kept resident by use (``manager``)."""

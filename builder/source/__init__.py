"""Where models come from, seen from the driver: the Hugging Face Hub (``hub``)."""

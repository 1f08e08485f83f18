"""Training data: readers for JSONL, VQAv2 and COCO layouts, and the collator that turns examples into batches."""

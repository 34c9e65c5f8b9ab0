"""Annotation files (COCO, MPII) read into one record per person (records.PersonRecord)."""

"""Lesson 07: merging the adapter into the base model and exporting it."""

"""Lesson 06: base against fine-tuned (`evaluate`), the `quality` report, chat and the emergency check."""

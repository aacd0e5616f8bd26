"""Prompt templates of published rewards, stored as data with their source (see each module)."""

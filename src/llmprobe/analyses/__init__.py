"""Analyses: plain functions that take a model or weight source and options and return records."""

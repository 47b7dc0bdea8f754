"""Pipeline stages: each reads the previous stage's output from the store and writes its own.

files -> ingest (survey store) -> preprocess -> select -> train -> validate -> infer -> catalog
"""

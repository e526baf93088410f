"""nnU-Net-style preprocessing (conversion, verification, planning, preprocessing, inverse).

Command line: ``python -m medtuning.preprocessing`` (or ``medtuning-preprocess``).
"""

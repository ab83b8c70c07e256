"""The EXPERIMENTAL chest radiograph path: CR/DX chest PA/AP + demographics + labs.

Off by default (``[xray] enabled``). Its image model (bundle cxr_fusion_v1) was trained only on
semi-synthetic radiographs derived from one real image, so every result, SR and SC says
EXPERIMENTAL and no accuracy is claimed. Children are never screened.
"""

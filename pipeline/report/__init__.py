"""Result datasets for the PACS: a TID 1500 Comprehensive 3D SR and a Secondary Capture."""

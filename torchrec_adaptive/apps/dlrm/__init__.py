"""The DLRM training app (issue 6). So far: its data sources (``apps.dlrm.data``)."""

"""Applications built on torchrec_adaptive (the DLRM training app lives in ``apps.dlrm``)."""

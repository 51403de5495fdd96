"""trimkit.backbones"""

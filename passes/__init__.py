"""trimkit.passes"""

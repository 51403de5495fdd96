"""Placeholder replaced below."""
def build_protocol_report(protocol, out_dir, readme=None):
    return {"markdown": ""}

"""
The measurements behind the README and docs/: each module is run by hand (`python -m benchmarks.<name>`) and writes
its report. What several reports share is in benchmarks.common. The side studies (GLOM, the digits ViT) are in
studies/.
"""

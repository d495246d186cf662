"""What S3 sources and S3 targets share.

settings   s3:// urls, client and SDK settings (no SDK import: POSIX-only configs start fast)
errors     converting SDK exceptions into replicator's error vocabulary
"""

"""What one storage backend does its own way: S3 multipart uploads (:mod:`.s3`),
compare-and-swap on one small object (:mod:`.conditional`, the output lease), and writeback of
local files while they are written (:mod:`.local`)."""

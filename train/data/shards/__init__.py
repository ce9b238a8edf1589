"""Streaming webdataset shards: find them (:mod:`.index`), plan each epoch's (rank, worker)
ranges (:mod:`.plan`), read/decode/batch in workers (:mod:`.stream`), and keep the exact
position in the main process (:mod:`.loader`)."""

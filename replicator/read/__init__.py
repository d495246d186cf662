"""The read stage: each changed file is read once, cut, hashed and encoded, in bounded memory.

    pipeline   ChunkPipeline: reads a file (or a batch of small ones) and hands its encoded
               chunks, in order, to a sink (the fan-out); bounds chunk bytes in memory
    chunking   where to cut: FastCDC over a file streamed in blocks
    encode     the CPU work per chunk: its id for every repository's hash spec, its encoding
               (replicator.format.chunks) and the self-check that the encoding decodes back
    helpers    the parent side of the helper processes that read and encode many small files
               (a Python thread per file would be GIL-bound)
    helper_main  what runs inside a helper process: nothing heavier than it needs

Nothing is imported here: a helper process imports ``replicator.read.helper_main`` alone.
"""

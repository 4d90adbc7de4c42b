"""The machinery the stages need that is not the method, imported by them and never run on its own.
It imports no stage but model and data.

  cli.py              flags from config dataclasses, range checks, one-line errors, progress
  files.py            files and folders written whole or not at all; JSON read with its file named
  records.py          users' files: sources, ShareGPT and OpenChat records read and checked
  tokenizer_files.py  SentencePiece and tokenizer.json files behind one interface
  hf.py               Hugging Face folders: config.json, safetensors, a base read into FSDP shards,
                      the vocabulary-rows rule
  job.py              a training job's processes, CPU threads, errors its ranks agree on, signals
  run_plan.py         a run's plan: packed steps per epoch, re-planned on another world size
  checkpoint.py       resumable checkpoints and the run directory
  exports.py          exports: writing them, crlft.json, loading one for inference
  metrics.py          the log rows of a run, MFU, the per-class loss
  generation.py       a request to sample.py's Generator, its completion, its streamed text
  server.py           the OpenAI-compatible endpoint of `sample.py --serve`
"""

"""Preloaded by the corpus generator's forkserver only (see ``synth_render.run_shards``).

Every shard is synthesised in a new process forked from that server. Importing torch and
running its first operations costs about 1.5 s and 0.1 s of one-off initialisation; done here
once, in the server, each shard process starts in milliseconds. eSpeak is not loaded here:
each shard process loads its own, fresh copy of the library state.
"""

import soundfile  # noqa: F401  (imported for the children)
import torch
import torchaudio

# Before any operation, so the server starts no thread pool (a fork would not copy it).
torch.set_num_threads(1)
# Same reason as in synth_render._synth_shard_unchecked: no per-length oneDNN plans.
torch.backends.mkldnn.enabled = False
torchaudio.transforms.Resample(22050, 16000)(torch.zeros(22050))

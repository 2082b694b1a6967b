"""A trained model for evaluation: batched generation with a key/value cache, and scoring.

Generation is one jitted program per (batch, prompt length, settings): `NMM.prefill` over the
left-padded prompts, then a `lax.scan` of `NMM.decode` steps, each sampling the next token
(greedy at temperature 0, else temperature and nucleus/top-p sampling). A row that has emitted
<eos> emits <pad> from then on; the scan always runs `max_new_tokens` steps, so the shape, and the
compile, stay fixed. Only text tokens are sampled (no <image> markers, no ids past the
tokenizer's vocabulary).

MoE layers run dropless here whatever `moe.capacity_factor` says: the capacity is a training-time
throughput limit whose drops depend on the padded row length, which a prompt does not have.
Scoring runs the model as the eval step does (`models/lm_head.token_nll`), so a scored document's
mean negative log-probability is its training loss.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmm_jax import config as config_lib
from nmm_jax import sharding
from nmm_jax.eval import sequences as seq_lib
from nmm_jax.models import NMM
from nmm_jax.models.lm_head import token_nll
from nmm_jax.models.variables import abstract_model_state


def inference_model_config(model_cfg):
  """The model config generation and scoring build: MoE dropless (same parameters)."""
  model_cfg = model_cfg.copy_and_resolve_references()
  model_cfg.moe.capacity_factor = 0.0
  return model_cfg


def sample_next(logits_BxV, key, allowed_V, temperature: float, top_p: float):
  """Next token ids [B]: argmax at temperature 0, else sampled from softmax(logits / T) cut to
  the smallest set of tokens whose probability reaches top_p."""
  logits_BxV = jnp.where(allowed_V, logits_BxV, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_p < 1:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the mass before it is under top_p (the most likely is always kept).
    kept_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
    cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generated:
  ids: list           # generated ids, up to (not including) <eos>
  logprobs: list      # the model's log-probability of each of them
  text: str
  finished: bool      # <eos> was generated within max_new_tokens


class InferenceModel:
  """`params` (an nnx.State, sharded over `mesh` or on one device) of a model built from
  `config` (a run's whole config: model, data sizes, loss chunk)."""

  @classmethod
  def initialised(cls, config, tokenizer, seed: int = 0):
    """A model with freshly initialised parameters (speed measurements need no training)."""
    return cls(config, nnx.state(NMM(config.model, rngs=nnx.Rngs(seed))), tokenizer)

  def __init__(self, config, params, tokenizer, mesh=None, step=None):
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.step = step  # the checkpoint step the parameters come from, when known
    self.graphdef, _ = abstract_model_state(inference_model_config(config.model))
    self.image_size = config.data.image_size
    self.patches_per_image = (config.data.image_size // config.model.patch_size) ** 2
    allowed = np.zeros(config.model.vocab_size, bool)
    allowed[:tokenizer.vocab_size] = True
    allowed[list(tokenizer.non_text_ids) + [tokenizer.bos_id]] = False
    self._allowed_V = allowed

  def sequence(self, images_IxSxSx3, text: str = "", eos: bool = False) -> seq_lib.Sequence:
    """<bos>, the images, the text's tokens (then <eos> if `eos`)."""
    ids = self.tokenizer.encode(text) + ([self.tokenizer.eos_id] if eos else [])
    return seq_lib.build_sequence(self.tokenizer, images_IxSxSx3, ids, self.patches_per_image)

  @staticmethod
  def _batches(sequences, batch_size: int):
    """(first index, the sequences of a batch, the same padded to `batch_size` with copies of
    its last, so every call has one shape); batch_size 0: all at once."""
    batch_size = batch_size or len(sequences)
    for start in range(0, len(sequences), batch_size):
      part = sequences[start:start + batch_size]
      yield start, part, part + [part[-1]] * (batch_size - len(part))

  def _run(self, jitted, *args):
    if self.mesh is None:
      return jitted(self.params, *args)
    # Every process holds the same inputs: placed replicated, so multi-process runs work too.
    replicated = sharding.replicated(self.mesh)
    args = jax.tree.map(lambda a: jax.make_array_from_process_local_data(replicated, a), args)
    rules = config_lib.sharding_rules(self.config)
    return sharding.traced_under(self.mesh, jitted, rules)(self.params, *args)

  def _jit(self, fn):
    # Over a mesh the outputs are replicated: every process can read them whole.
    if self.mesh is None:
      return jax.jit(fn)
    return jax.jit(fn, out_shardings=sharding.replicated(self.mesh))

  @functools.lru_cache(maxsize=8)
  def _generate_fn(self, max_new_tokens: int, temperature: float, top_p: float):
    graphdef, allowed_V = self.graphdef, jnp.asarray(self._allowed_V)
    eos_id, pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id

    def generate(params, prompt, key):
      model = nnx.merge(graphdef, params)
      logits_BxV, state = model.prefill(prompt, prompt["tokens"].shape[1] + max_new_tokens)

      def step(carry, key_t):
        logits_BxV, state, done_B = carry
        # Merged again inside the scan body, from fresh variables: nnx variables must not cross
        # into an inner trace.
        model = nnx.merge(graphdef, jax.tree.map(lambda a: a, params))
        token_B = sample_next(logits_BxV, key_t, allowed_V, temperature, top_p)
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None],
                                        axis=-1)[:, 0]
        token_B = jnp.where(done_B, pad_id, token_B)
        logits_BxV, state = model.decode(token_B, state)
        return (logits_BxV, state, done_B | (token_B == eos_id)), (token_B, logprob_B)

      done_B = jnp.zeros(logits_BxV.shape[:1], bool)
      _, (tokens_KxB, logprobs_KxB) = jax.lax.scan(
          step, (logits_BxV, state, done_B), jax.random.split(key, max_new_tokens))
      return tokens_KxB.T, logprobs_KxB.T

    return self._jit(generate)

  def generate(self, sequences, max_new_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, batch_size: int = 0) -> list[Generated]:
    """Continues each prompt; `batch_size` rows per call (default: all at once; the last batch
    is padded with copies so every call has one shape)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
      raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    length = max(len(s.tokens) for s in sequences)
    fn = self._generate_fn(max_new_tokens, float(temperature), float(top_p))
    key = jax.random.key(seed)
    out = []
    for start, chunk, padded in self._batches(sequences, batch_size):
      prompt = seq_lib.prompt_batch(padded, self.tokenizer, self.image_size, length)
      tokens_BxK, logprobs_BxK = jax.device_get(
          self._run(fn, prompt, jax.random.fold_in(key, start)))
      for ids, logprobs in zip(tokens_BxK[:len(chunk)], logprobs_BxK[:len(chunk)]):
        ends = np.flatnonzero(ids == self.tokenizer.eos_id)
        n = int(ends[0]) if len(ends) else len(ids)
        out.append(Generated([int(i) for i in ids[:n]], [float(p) for p in logprobs[:n]],
                             self.tokenizer.decode(ids[:n]), bool(len(ends))))
    return out

  @functools.lru_cache(maxsize=2)
  def _score_fn(self):
    graphdef, chunk = self.graphdef, self.config.train.loss_chunk

    def score(params, batch):
      model = nnx.merge(graphdef, params)
      return -token_nll(model(batch), model.head_weight_DxV(), batch["targets"], chunk)
    return self._jit(score)

  def score(self, sequences, batch_size: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(target ids, log-probabilities) of each sequence's text tokens after the first: the
    tokens a training step scores."""
    chunk = self.config.train.loss_chunk
    longest = max(len(s.tokens) for s in sequences) - 1
    length = -(-longest // chunk) * chunk  # the loss runs over whole chunks
    out = []
    for _, part, padded in self._batches(sequences, batch_size):
      batch = seq_lib.scored_batch(padded, self.tokenizer, self.image_size, length)
      logprobs_BxL = jax.device_get(self._run(self._score_fn(), batch))
      for r in range(len(part)):
        mask = batch["loss_mask"][r] > 0
        out.append((batch["targets"][r][mask], logprobs_BxL[r][mask]))
    return out

"""An nmm_jax native multimodal model as a transformers causal LM (remote code).

The math is nmm_torch.py's, shipped beside this file (transformers copies relatively imported
files with it): the model holds an nmm_torch.NMMTorch whose parameters are nmm_jax's, named by
their path in the model ('.' written '/', the ParameterDict's rule). Inputs are the processor's:
input_ids, attention_mask (1 = a token, 0 = left padding), image_ids / patch_ids (-1 for text)
and pixel_values (uint8 [B, I, S, S, 3]). Attention is causal, bidirectional among one image's
patches (nmm_torch.attention_mask: a 4-d mask from the image ids), never to padding. Without
a cache, attention_mask may also hold packed rows' segment ids (0 = padding; attention stays
within a segment), with their position_ids: the batch layout nmm_jax trains on.

Decoding keeps each layer's keys and values in the Cache generate() passes (DynamicCache:
`update(k, v, layer)`), and internal_xattn's encoder features on it, for the tokens that follow
the prompt. Decoded tokens are text only: a call with a non-empty cache takes no images.
"""
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nmm import NMMConfig
from .nmm_torch import NMMTorch
from .nmm_torch import attention_mask as nmm_attention_mask

_IMAGE_STATE = "nmm_image_state"  # the attribute of the cache holding nmm_torch's image state


class NMMForCausalLM(PreTrainedModel, GenerationMixin):
  config_class = NMMConfig
  base_model_prefix = "nmm"
  main_input_name = "input_ids"
  _supports_cache_class = True

  def __init__(self, config: NMMConfig):
    super().__init__(config)
    # Empty tensors of the saved shapes: from_pretrained fills them from model.safetensors.
    self.nmm = NMMTorch(config.nmm_model, {name: torch.empty(shape)
                                           for name, shape in config.param_shapes.items()})
    self.post_init()

  def _init_weights(self, module):
    pass  # every parameter is in the checkpoint: there is nothing to initialise

  def get_input_embeddings(self):
    return None

  def forward(self, input_ids, attention_mask=None, image_ids=None, patch_ids=None,
              pixel_values=None, position_ids=None, past_key_values=None, use_cache=None,
              logits_to_keep=0, return_dict=True, **kwargs):
    b, length = input_ids.shape
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    if attention_mask is None:
      attention_mask = torch.ones(b, past + length, dtype=torch.long)
    if image_ids is None:
      image_ids = torch.full_like(input_ids, -1)
      patch_ids = image_ids
    if position_ids is None:
      # Positions from 0 at each row's first token: left padding is not counted.
      position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    if past and (pixel_values is not None or (image_ids >= 0).any()):
      raise ValueError("images go in the prompt: a call with a non-empty cache takes text only")
    if use_cache and past_key_values is None:
      past_key_values = DynamicCache(config=self.config)
    with torch.no_grad():
      if past:  # decoding: what the prompt's images give later tokens is kept on the cache
        x, _, _ = self.nmm.embed(input_ids, attention_mask[:, -length:], image_ids)
        before = self.nmm.decode_injections(getattr(past_key_values, _IMAGE_STATE, None))
        keys = attention_mask.bool()  # [B, past + L]
        causal = (torch.arange(length)[:, None] + past) >= torch.arange(past + length)[None, :]
        mask = keys[:, None, None, :] & causal[None, None]
      else:
        segment_ids = attention_mask[:, -length:].long()
        x, before, state = self.nmm.embed(input_ids, segment_ids, image_ids, patch_ids,
                                          pixel_values)
        mask = nmm_attention_mask(segment_ids, image_ids)
        if past_key_values is not None:
          setattr(past_key_values, _IMAGE_STATE, state)
      kv = None
      if past_key_values is not None:
        def kv(layer, k, v):  # nmm_torch's [B, L, K, E]; the cache holds [B, K, T, E]
          k, v = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), layer)
          return k.transpose(1, 2), v.transpose(1, 2)
      hidden = self.nmm.decode_layers(x, position_ids, mask, image_ids >= 0, before, kv)
      if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
      logits = self.nmm.head(hidden)
    return CausalLMOutputWithPast(logits=logits,
                                  past_key_values=past_key_values if use_cache else None)

  def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                    image_ids=None, patch_ids=None, pixel_values=None,
                                    is_first_iteration=False, **kwargs):
    inputs = super().prepare_inputs_for_generation(
        input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
        is_first_iteration=is_first_iteration, **kwargs)
    inputs.pop("position_ids", None)  # forward counts them from the attention mask
    # The images are the prompt's: after it, only the new (text) token goes in.
    if is_first_iteration or not kwargs.get("use_cache", True):
      if image_ids is not None:  # without a cache the whole sequence runs: the generated
        grown = inputs["input_ids"].shape[1] - image_ids.shape[1]  # tokens so far are text
        image_ids, patch_ids = (torch.nn.functional.pad(ids, (0, grown), value=-1)
                                for ids in (image_ids, patch_ids))
      inputs.update(image_ids=image_ids, patch_ids=patch_ids, pixel_values=pixel_values)
    return inputs


"""EchoCLIP-R: EchoCLIP's towers with the template tokenizer (909 ids, BOS 907, EOS 908).

The template vocabulary is EchoCLIP-R's own data: pass its path with
`--config.tokenizer.path=/path/to/template_vocab.txt`.
"""

from echoclip_jax.config import files


def get_config():
    c = files.sibling(__file__, "echoclip.py")
    c.tokenizer.name = "template"
    c.model.text.vocab_size = 909
    c.model.text.pool = "eos"
    c.model.text.eos_id = 908
    c.init.kind = "random"  # the text tower's vocabulary differs from LAION CLIP's
    return c

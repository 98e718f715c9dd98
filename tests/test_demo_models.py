"""The locally built tiny models and tokenizers that the demo, the benchmark, the recipe and the tests share."""

from memvp_peft.demo_models import FixedVocabTokenizer, tiny_llama, tiny_llama_config


def test_fixed_vocab_tokenizer_ids_follow_the_word_list_after_the_specials():
    tokenizer = FixedVocabTokenizer(["what", "is", "7", "is"])  # repeats are dropped
    assert tokenizer.vocab == ["<pad>", "<bos>", "<eos>", "<unk>", "what", "is", "7"]
    specials = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert specials == (0, 1, 2, 3)
    assert tokenizer.encode("what is 8", add_bos=True, add_eos=True) == [1, 4, 5, 3, 2]


def test_fixed_vocab_tokenizer_decode_stops_at_eos_and_drops_specials():
    tokenizer = FixedVocabTokenizer(["a", "b"])
    assert tokenizer.decode([1, 4, 0, 5, 2, 4]) == "a b"


def test_tiny_llama_config_shape_and_overrides():
    config = tiny_llama_config(vocab_size=20, hidden_size=64, layers=3, max_position_embeddings=32)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (20, 64, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (3, 4, 2)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert config.max_position_embeddings == 32


def test_tiny_llama_takes_vocabulary_and_special_ids_from_the_tokenizer():
    tokenizer = FixedVocabTokenizer(["x", "y", "z"])
    model = tiny_llama(tokenizer, hidden_size=32)
    assert model.config.vocab_size == len(tokenizer) == 7
    assert model.get_input_embeddings().padding_idx == tokenizer.pad_token_id


def test_the_local_models_import_path_is_a_shim_for_demo_models():
    """`memvp_peft.local_models`, the path earlier docs and user code import, gives the very same objects."""
    import memvp_peft.demo_models as demo_models
    import memvp_peft.local_models as local_models

    assert local_models.__all__ == demo_models.__all__
    assert all(getattr(local_models, name) is getattr(demo_models, name) for name in demo_models.__all__)

"""TransformerLens compatibility, in one place: the `model.cfg` view (config_view), the tokenizer methods
(tokens), the ActivationCache subclass (activation_cache), the weight views (weights), the hook plumbing and
TransformerLens argument spellings (interface), and TransformerLens's opt-in weight processing
(weight_processing). HookedDecoder (lens_det.model) mixes in TLWeights, TLTokens and TLInterface.

Nothing is imported here, so that importing one of these modules does not import the others."""

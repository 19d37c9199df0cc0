"""The runtime stage: CompiledAttention (its prepared state and the one dispatch of a call), the
torch.compile op, argument checks, non-finite isolation, extra tokens and sub-ranges, the KV
cache, md.merge and the Flex interop artefacts."""

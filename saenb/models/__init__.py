"""Where models and tokens come from: presets (`presets`: a model, SAE sources per hook family, token source;
`loaded`: a preset's model, SAEs and tokens, as `saenb.assembly.load_preset` builds it),
the Hugging Face hub (`hub`: is it reachable; `data`: OpenWebText contexts) and its synthetic offline stand-in
(`synthetic_hub`), models that ship inside a package registry (`pretrained`: SmolLM2-135M from a GGUF file), and
the offline bundles the project builds itself (`bundle`: the builder; `bundle_io`: the on-disk format)."""

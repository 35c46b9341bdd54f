"""The supply chain, from formats up to policy.

- ``sign``: signing keys and the signature formats (cosign, DSSE, OpenSSF model signing).
- ``facts``: what the documents are about (subjects, file digests, the build record's facts) and
  the in-toto Statement; ``sbom`` (CycloneDX), ``provenance`` (SLSA) and ``evaluation_statement``
  (in-toto test-result) build one document each from them.
- ``attach``: stores the documents and their signatures as referrers of packaged content.
- ``verify``: what a pull and `build verify` require before trusting content.

Nothing here imports ``builder.publish``: packaging and distribution build on this package.
"""

"""The supply chain: signing keys and signature formats (``sign``), and the documents that
travel as referrers: SBOM, SLSA provenance and the evaluation (``attest``)."""

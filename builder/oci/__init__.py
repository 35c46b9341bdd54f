"""OCI content: the local store, an OCI image layout (``layout``), the registry client with
references and credentials (``registry``), and referrers (``referrers``)."""

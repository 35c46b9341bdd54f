"""OCI content: the media types of the formats we write (``media``), the local store, an OCI
image layout (``layout``), references (``reference``), registry credentials and secret
redaction (``credentials``), the registry client (``registry``), referrers (``referrers``) and
opening a reference from the store or a registry (``content``). The HTTP deadline watchdog the
client uses is ``builder.transport``."""

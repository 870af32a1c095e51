//! Reading an image source: an OCI image layout directory, an OCI archive or a Docker
//! archive.

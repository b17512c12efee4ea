//! virtio-blk over vhost-user: request parsing and the backend.

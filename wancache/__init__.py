"""wancache: a FUSE filesystem that makes a far NFSv3 export feel local."""

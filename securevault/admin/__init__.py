"""C{securevault-admin} and the operator's tools: the development PKI, key
rotation, verification and export, migration and copying between stores."""

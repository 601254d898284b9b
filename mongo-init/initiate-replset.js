// Compose healthcheck for the `mongo` service (docker-compose.yml):
//   mongosh --quiet /mongo-init/initiate-replset.js
// Initiates the single-node replica set `rs0` the first time it runs, then exits 0 only once
// this node is PRIMARY, so that services with `condition: service_healthy` start against a
// writable replica set. Safe to run any number of times.
const config = { _id: 'rs0', members: [{ _id: 0, host: 'mongo:27017' }] };

try {
  rs.status();
} catch (e) {
  if (e.codeName !== 'NotYetInitialized') throw e;
  try {
    rs.initiate(config);
    print('initiated replica set rs0');
  } catch (e2) {
    // Another run initiated it in between: nothing to do.
    if (e2.codeName !== 'AlreadyInitialized') throw e2;
  }
}

if (!db.hello().isWritablePrimary) {
  print('replica set rs0 not primary yet');
  quit(1);
}
print('PRIMARY');

// Starts dynalite on 127.0.0.1 with a port chosen by the kernel at listen time and prints
// `listening PORT` once it accepts connections. Picking a "free" port beforehand and passing
// it to dynalite's own CLI races with other tests (and with TCP self-connect), so the test
// harness reads the port from here instead.
//
// usage: node serve.js [createTableMs]
'use strict'
const dynalite = require('dynalite')

const createTableMs = Number(process.argv[2] || 0)
const server = dynalite({ createTableMs, deleteTableMs: createTableMs, updateTableMs: createTableMs })
server.listen(0, '127.0.0.1', function () {
  process.stdout.write('listening ' + server.address().port + '\n')
})
// The harness holds our stdin; when it goes away (test process killed), so do we.
process.stdin.on('end', function () { process.exit(0) })
process.stdin.resume()

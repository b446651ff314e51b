// A Node backend calling enrollment.v1.EnrollmentService, as the README's
// "Calling from other languages" tells it to. tests/test_interop.py runs it against a
// real server:
//
//   node client.js ADDRESS BIG_STUDENT_ID
//
// BIG_STUDENT_ID names a student the test made with an id above 2^53, which a
// JavaScript number cannot hold. Prints one "ok ..." line per check and a last line
// of JSON with what it made; exits 1 on the first check that fails.
'use strict';

const assert = require('node:assert/strict');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = process.env.ENROLLMENT_PROTOS || path.resolve(__dirname, '../../../protos');

// keepCase: fields keep their proto names (student_id); without it proto-loader wants
// studentId and silently drops {student_id: 1}. longs: String: int64 ids arrive as
// decimal strings, exact above 2^53. defaults: zero values (enrolled_count 0) are
// present instead of missing.
const definition = protoLoader.loadSync('enrollment/v1/enrollment.proto', {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { EnrollmentService } = grpc.loadPackageDefinition(definition).enrollment.v1;

// The error details: a google.rpc.Status in the grpc-status-details-bin trailer.
const googleRpc = new protobuf.Root();
googleRpc.resolvePath = (origin, target) => path.join(PROTOS, target);
googleRpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], {
  keepCase: true,
});
const Status = googleRpc.lookupType('google.rpc.Status');

function errorDetails(err) {
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  const found = {};
  if (!bin) return found;
  for (const any of Status.decode(bin).details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = googleRpc.lookupType(name);
    found[name.slice(name.lastIndexOf('.') + 1)] = type.toObject(type.decode(any.value), {
      longs: String,
    });
  }
  return found; // { ErrorInfo: {reason, domain, metadata}, BadRequest: {field_violations} }
}

const client = new EnrollmentService(process.argv[2], grpc.credentials.createInsecure());

function call(method, request, through = client) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 5000);
    through[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function failure(method, request, through = client) {
  try {
    await call(method, request, through);
  } catch (err) {
    return err;
  }
  throw new Error(`${method} succeeded; it should have failed`);
}

// The events of a WatchEvents stream one by one (a response may carry several); it
// throws the stream's error, CANCELLED after watch.cancel().
async function* eventsOf(watch) {
  for await (const response of watch) yield* response.events;
}

function ok(what) {
  console.log(`ok ${what}`);
}

async function main() {
  const bigId = process.argv[3];
  const suffix = `${process.pid}-${Date.now()}`;

  const { student } = await call('CreateStudent', {
    name: 'Node Client',
    email: `node-${suffix}@example.com`,
  });
  assert.equal(typeof student.id, 'string');
  assert.match(student.id, /^[1-9][0-9]*$/);
  ok(`CreateStudent id ${student.id}`);

  const { course } = await call('CreateCourse', { code: `JS-${process.pid}`, title: 'Node', capacity: 2 });
  assert.equal(course.enrolled_count, 0); // present thanks to defaults: true
  assert.equal(course.capacity, 2);
  ok(`CreateCourse id ${course.id}`);

  const { enrollment } = await call('EnrollStudent', { student_id: student.id, course_id: course.id });
  assert.deepEqual([enrollment.student_id, enrollment.course_id], [student.id, course.id]);
  ok('EnrollStudent');

  const courses = await call('ListCourses', { student_id: student.id });
  assert.deepEqual(courses.courses.map((c) => [c.id, c.enrolled_count]), [[course.id, 1]]);
  assert.equal(courses.next_page_token, '');
  ok('ListCourses of the student');

  // A missing course: INVALID_ARGUMENT with ErrorInfo and BadRequest.
  const missingCourse = '999999999';
  const err = await failure('EnrollStudent', { student_id: student.id, course_id: missingCourse });
  assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
  assert.equal(err.details, `course ${missingCourse} does not exist`);
  const details = errorDetails(err);
  assert.equal(details.ErrorInfo.reason, 'COURSE_NOT_FOUND');
  assert.equal(details.ErrorInfo.domain, 'enrollment.v1');
  assert.deepEqual(details.ErrorInfo.metadata, { course_id: missingCourse });
  assert.deepEqual(details.BadRequest.field_violations.map((v) => v.field), ['course_id']);
  ok('EnrollStudent into a missing course: INVALID_ARGUMENT COURSE_NOT_FOUND [course_id]');

  // An id above 2^53 goes out and comes back exactly, as a string.
  assert.notEqual(String(Number(bigId)), bigId, 'the test should pass an id a double cannot hold');
  const big = (await call('GetStudent', { student_id: bigId })).student;
  assert.equal(big.id, bigId);
  ok(`GetStudent ${bigId}`);

  // The change feed: the course's events so far, then a watch from the first of them.
  // It replays the stored one after it, then streams the change made while it is open.
  const feed = await call('ListEvents', { course_id: course.id });
  assert.deepEqual(feed.events.map((e) => e.type), ['EVENT_TYPE_COURSE_CREATED', 'EVENT_TYPE_ENROLLED']);
  const [created, firstEnrolled] = feed.events;
  assert.ok(BigInt(created.sequence) < BigInt(firstEnrolled.sequence));
  ok(`ListEvents of the course: COURSE_CREATED ${created.sequence}, ENROLLED ${firstEnrolled.sequence}`);
  const watch = client.WatchEvents(
    { after_sequence: created.sequence, course_id: course.id },
    { deadline: new Date(Date.now() + 20000) },
  );
  const events = eventsOf(watch);
  const replayed = (await events.next()).value;
  assert.deepEqual(
    [replayed.type, replayed.sequence, replayed.enrollment.student_id],
    ['EVENT_TYPE_ENROLLED', firstEnrolled.sequence, student.id],
  );
  await call('EnrollStudent', { student_id: bigId, course_id: course.id });
  const streamed = (await events.next()).value;
  assert.equal(streamed.type, 'EVENT_TYPE_ENROLLED');
  assert.ok(BigInt(streamed.sequence) > BigInt(replayed.sequence));
  assert.deepEqual([streamed.student_id, streamed.course_id], [bigId, course.id]);
  assert.deepEqual([streamed.enrollment.student_id, streamed.course.enrolled_count], [bigId, 2]);
  watch.cancel();
  const ended = await events.next().then(
    () => null,
    (err) => err,
  );
  assert.equal(ended && ended.code, grpc.status.CANCELLED);
  ok(`WatchEvents after ${created.sequence}: replayed ${replayed.sequence}, streamed ENROLLED ${streamed.sequence}, cancelled`);

  const roster = await call('ListStudents', { course_id: course.id });
  const byId = (a, b) => (BigInt(a) < BigInt(b) ? -1 : 1); // ordered by id, not by text
  assert.deepEqual(roster.students.map((s) => s.id), [student.id, bigId].sort(byId));
  ok('ListStudents roster holds the big id exactly');

  // The largest int64: as a number it would be 9223372036854775808, out of range.
  const nextId = '9223372036854775807';
  const notFound = await failure('GetStudent', { student_id: nextId });
  assert.equal(notFound.code, grpc.status.NOT_FOUND);
  const info = errorDetails(notFound).ErrorInfo;
  assert.equal(info.reason, 'STUDENT_NOT_FOUND');
  assert.deepEqual(info.metadata, { student_id: nextId });
  assert.equal(notFound.details, `student ${nextId} does not exist`);
  ok(`GetStudent ${nextId}: NOT_FOUND STUDENT_NOT_FOUND names the exact id`);

  // Why keepCase: without it proto-loader wants studentId and silently drops student_id,
  // so the server gets 0 and says which field is missing.
  const camelCase = grpc.loadPackageDefinition(
    protoLoader.loadSync('enrollment/v1/enrollment.proto', { includeDirs: [PROTOS], longs: String }),
  ).enrollment.v1;
  const camelClient = new camelCase.EnrollmentService(process.argv[2], grpc.credentials.createInsecure());
  const dropped = await failure('GetStudent', { student_id: bigId }, camelClient);
  camelClient.close();
  assert.equal(dropped.code, grpc.status.INVALID_ARGUMENT);
  assert.deepEqual(errorDetails(dropped).BadRequest.field_violations.map((v) => v.field), ['student_id']);
  ok('without keepCase, {student_id} is dropped: INVALID_ARGUMENT [student_id]');

  console.log(JSON.stringify({ student_id: student.id, course_id: course.id, big_id: bigId }));
}

main()
  .then(() => client.close())
  .catch((err) => {
    console.error(`FAILED: ${err.stack || err}`);
    client.close();
    process.exit(1);
  });

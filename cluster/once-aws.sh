#!/usr/bin/env bash
# Once per AWS account, before the first `ray up` (README "First deploy"): the head's and the workers'
# roles and instance profiles, EC2's spot service-linked role, the security group of the cluster, and the
# ECR repository of the image built from cluster/Dockerfile.
# Run the rendered copy (`python -m cluster render` fills in the account, region, bucket and SSH range):
#
#   bash rendered/once-aws.sh
#
# Safe to run again: a step whose result exists already says so and the script goes on.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
region=us-east-1

# Runs a create command; "already exists" is fine, any other error stops the script. (A role added to its
# instance profile before is answered with the profile's quota of one role, InstanceSessionsPerInstanceProfile.)
once() {
  local out
  if out=$("$@" 2>&1); then
    echo "$out"
  elif grep -qiE "already exists|EntityAlreadyExists|InvalidPermission.Duplicate|InvalidGroup.Duplicate|has been taken|InstanceSessionsPerInstanceProfile" <<<"$out"; then
    echo "exists already: $*"
  else
    echo "$out" >&2
    return 1
  fi
}

# ddetr-ray-head (aws-iam/ddetr-ray-head.json): launch, tag and terminate the instances tagged
# ray-cluster-name=ddetr in the region, pass the workers their role and no other, read the Deep Learning
# AMI's SSM parameter, the bucket. ddetr-ray-worker (aws-iam/ddetr-ray-worker.json): the bucket only.
for role in ddetr-ray-head ddetr-ray-worker; do
  once aws iam create-role --role-name $role --assume-role-policy-document "file://$here/aws-iam/trust-ec2.json"
  aws iam put-role-policy --role-name $role --policy-name $role --policy-document "file://$here/aws-iam/$role.json"
  once aws iam create-instance-profile --instance-profile-name $role
  once aws iam add-role-to-instance-profile --instance-profile-name $role --role-name $role
done

# Spot instances need EC2's service-linked role.
once aws iam create-service-linked-role --aws-service-name spot.amazonaws.com

# The cluster's security group in the default VPC (aws.yaml names it: provider.security_group). Made here
# with its rules, so `ray up` uses it as it is instead of making one that admits SSH from anywhere: SSH
# from ssh_cidr of the settings only, everything between the cluster's own nodes.
vpc=$(aws ec2 describe-vpcs --region $region --filters Name=isDefault,Values=true --query 'Vpcs[0].VpcId' --output text)
once aws ec2 create-security-group --region $region --vpc-id "$vpc" --group-name ddetr-ray \
  --description "Ray cluster ddetr: SSH from 198.51.100.0/24, all traffic within the group"
sg=$(aws ec2 describe-security-groups --region $region --filters Name=vpc-id,Values="$vpc" Name=group-name,Values=ddetr-ray \
  --query 'SecurityGroups[0].GroupId' --output text)
once aws ec2 authorize-security-group-ingress --region $region --group-id "$sg" --protocol tcp --port 22 --cidr 198.51.100.0/24
once aws ec2 authorize-security-group-ingress --region $region --group-id "$sg" --protocol=-1 --source-group "$sg"

# The image's repository (aws.yaml's docker.image); the nodes pull it with their roles' ECR rights.
once aws ecr create-repository --region $region --repository-name ray-deformable-detr
